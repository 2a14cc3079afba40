"""Tools around the method, not the method: the shapes-world demo, the benchmark and memory plan, export to
transformers/diffusers/peft folders, the release converter, and the offline tiny preset's builder."""
