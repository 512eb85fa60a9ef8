"""The Batch service: sorts folders of images into category folders through the Inference service."""
