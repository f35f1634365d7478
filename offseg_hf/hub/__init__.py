"""Hub repos: model folders with cards, the endpoint handler (`templates/handler.py`), the Space, and the example
photos each card shows (`examples.py`, `example_images/`)."""
