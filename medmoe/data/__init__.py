"""Data: records, images, chat templates and the torch datasets built from them."""
