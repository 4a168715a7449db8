"""The folder command, `captioner caption`: image files and folders in, JSON lines, CSV or COCO results out."""
