"""Text (SentencePiece) and image (VQ-GAN) tokenizers."""
