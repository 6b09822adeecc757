"""Method adapters behind one protocol, the method registry, backbones and diffusion plumbing."""
