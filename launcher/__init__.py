"""ftlaunch: plan GPU memory, generate the DeepSpeed config, launch TRL fine-tuning recipes."""

__version__ = "0.1.0"
