"""The demos that need nothing downloaded: ``quickstart`` (pretraining on the standard
library) and ``instruct`` (instruction finetuning on facts ``stdlib_tasks`` reads from it)."""
