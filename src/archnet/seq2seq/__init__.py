"""Encoder-decoder Transformers (translation): a swappable mirror of Hugging Face models,
decoding, the Arch-Net conversion, distillation and export."""
