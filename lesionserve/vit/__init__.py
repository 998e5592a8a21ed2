"""The ViT melanoma classifier (seed 001's system): one timm ViT/DeiT backbone shared by a head per
dataset, trained with gradual unfreezing, explained by attention maps, served as ``melanoma_vit``."""
