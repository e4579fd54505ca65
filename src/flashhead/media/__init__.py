"""Reading and writing media: images, faces, audio files, videos, watermarks."""
