import torch

# Tiny models on a small CPU: one thread per process is faster than two fighting over the cores.
torch.set_num_threads(1)
