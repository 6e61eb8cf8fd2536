"""Attention backends (chunked, splash, cudnn); the lead's `attend` seam replaces this file at merge."""
