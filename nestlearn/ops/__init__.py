"""Pure tensor functions (no parameters, no nn.Module). Each op has a per-token `naive` reference."""
