"""One module per model family; see mmedge/exporters/family.py for the contract."""
