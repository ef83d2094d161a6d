"""Data sets, resumable sampling and loading, and the VQA pipeline (text, images, packing). Pure PyTorch + PIL."""
