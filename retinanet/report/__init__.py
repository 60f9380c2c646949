"""What a run shows and records: pictures (``plots``), TensorBoard views (``tensorboard``), boxes drawn on images
(``visualize``), the model card beside ``best.pt`` (``model_card``) and where a run came from (``provenance``)."""
