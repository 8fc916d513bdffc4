"""Video reading and writing: GIF, MP4 (H.264), WebP and folders of PNG frames, with the
settings a video was made with embedded in it (`read_settings`)."""

from animatediff.provenance import read_settings
from animatediff.video.grid import video_grid
from animatediff.video.read import VideoInfo, VideoReadError, read_video, video_info
from animatediff.video.write import Video, save_video

__all__ = [
    "Video",
    "VideoInfo",
    "VideoReadError",
    "read_settings",
    "read_video",
    "save_video",
    "video_grid",
    "video_info",
]
