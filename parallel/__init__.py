"""Expert parallelism: the partition plan from config shapes and routing statistics (partition.py) and the
per-rank graphs of an expert-parallel package (expert_parallel.py); their torch.distributed runtime ships
inside the package (runtime/ep_runtime.py)."""
