"""Cross-modal speculative decoding: an event-camera VLM drafts tokens for an RGB-video VLM."""
