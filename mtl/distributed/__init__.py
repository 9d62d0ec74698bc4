"""The distributed layer: Ray Train (DDP, DeepSpeed) and Ray Tune. The only place that imports
Ray or DeepSpeed."""
