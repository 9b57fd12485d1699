"""Masks that zero weights and stay through fine-tuning: single weights by magnitude, N:M,
patterns (shape, kernel, stripe, vector, block), the SWP filter skeleton, and the compacted
convs that make shape and stripe masks pay."""
