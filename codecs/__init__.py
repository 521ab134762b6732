"""Image codecs: a batch of RGB uint8 images in, one self-describing bitstream per image out."""
