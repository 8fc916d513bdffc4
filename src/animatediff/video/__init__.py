"""Video reading and writing: GIF, MP4 (H.264), WebP and folders of PNG frames."""

from animatediff.video.read import VideoInfo, VideoReadError, read_video, video_info
from animatediff.video.write import Video, save_video

__all__ = ["Video", "VideoInfo", "VideoReadError", "read_video", "save_video", "video_info"]
