"""`moe-merge train-router`: the accelerate loop (`loop.py`), its rows (`data.py`) and what it optimizes
(`objectives.py`)."""
