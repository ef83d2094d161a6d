"""Metrics of generated images: the detector, reference statistics, FID / KID / IS / PR, the digits judge."""
