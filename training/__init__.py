"""What runs inside one rank, and never imports Ray: the Trainer (trainer.py), DeepSpeed around the plain
model (engine.py), checkpoints (checkpoint.py), held-out evaluation (evaluate.py) and the metrics between
two log points (metrics.py). The Ray wiring that hands it a stream and a tracker is cluster/worker.py."""
