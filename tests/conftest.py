import torch

# one torch thread per rank: under mpiexec the ranks share the cores
torch.set_num_threads(1)
