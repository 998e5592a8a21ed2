"""LesionServe core: the pieces shared by training, export, serving and the reference pipeline.

Everything here is plain numpy/OpenCV so the Triton python models can import it without torch.
"""
