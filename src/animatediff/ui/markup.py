"""The page's small pieces of HTML and CSS: the progress box, messages, the result line."""

from __future__ import annotations

import html

from .jobs import QUEUED, Job
from .results import Result

CSS = """
#result img { image-rendering: pixelated; min-height: 256px; object-fit: contain; }
.ad-progress { font-variant-numeric: tabular-nums; padding: 4px 0; }
.ad-bar { height: 10px; border-radius: 5px; background: var(--neutral-200); overflow: hidden; }
.ad-fill { height: 100%; background: var(--color-accent); transition: width .2s; }
.ad-message { padding: 8px 12px; border-radius: 6px; }
.ad-error { background: #fde8e8; color: #9b1c1c; border: 1px solid #f8b4b4; }
.ad-note { background: var(--neutral-100); }
"""


COPY_JS = """
(command) => {
  try { navigator.clipboard.writeText(command); } catch (e) {}
  return command;
}
"""


def progress_html(job: Job | None, ahead: int = 0) -> str:
    """The progress box: queued (with the line ahead), loading, step N/M with ETA, done."""
    if job is None:
        return '<div class="ad-progress" data-state="idle"></div>'
    if job.state == QUEUED:
        text = f"Queued: {ahead} generation{'s' if ahead != 1 else ''} ahead"
        return _progress(job.state, 0, text)
    if job.phase != "denoising" or not job.total:
        return _progress(job.state, 0, html.escape(job.phase.capitalize()) + "...")
    eta = job.eta()
    text = f"Step {job.step} / {job.total}"
    if job.passes > 1:
        text += f" (pass {job.pass_index + 1} of {job.passes})"
    if eta is not None:
        text += f" &middot; ETA {eta:.0f} s"
    done = (job.pass_index * job.total + job.step) / (
        max(job.passes, job.pass_index + 1) * job.total
    )
    return _progress(job.state, 100 * done, text, job.step, job.total)


def _progress(state: str, percent: float, text: str, step: int = 0, total: int = 0) -> str:
    return (
        f'<div class="ad-progress" data-state="{state}" data-step="{step}" data-total="{total}">'
        f'<div class="ad-bar"><div class="ad-fill" style="width:{percent:.0f}%"></div></div>'
        f"<span>{text}</span></div>"
    )


def done_html(seconds: float) -> str:
    return _progress("done", 100, f"Done in {seconds:.1f} s")


def message_html(text: str, error: bool = True) -> str:
    if not text:
        return ""
    kind = "ad-error" if error else "ad-note"
    return f'<div class="ad-message {kind}" role="alert">{html.escape(text)}</div>'


def result_info(result: Result, seconds: float | None = None) -> str:
    s = result.summary
    parts = [
        f"**Seed** `{s.get('seed')}`",
        f"{s.get('num_frames')} frames",
        f"{s.get('width')}x{s.get('height')}",
        f"{s.get('steps')} steps",
        str(s.get("scheduler")),
        f"guidance {s.get('guidance_scale')}",
    ]
    if seconds is not None:
        parts.append(f"{seconds:.1f} s")
    return " &middot; ".join(parts)
