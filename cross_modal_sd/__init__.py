"""Cross-modal speculative decoding."""
