"""LesionServe core: the pieces shared by training, export, serving and the reference pipeline.

What the CPU Triton python models import is plain numpy/OpenCV (torch is imported only where a
GPU variant or the reference pipeline asks for it: arrays.py does so lazily, on a torch tensor).
"""
