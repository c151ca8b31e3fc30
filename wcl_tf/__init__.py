"""wcl_tf: Weakly Supervised Contrastive Learning (Zheng et al., ICCV 2021) in Keras 3."""

__version__ = "0.1.0"
