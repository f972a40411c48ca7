"""What leaves a dynamic model for other stacks: fixed merge weights baked into a dense model (`bake.py`) or
written as a PEFT adapter (`lora.py`), the model cards (`card.py`) and the Hub upload (`push.py`)."""
