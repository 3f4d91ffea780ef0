"""What every layer shares, and nothing more: the errors omnistream raises on purpose (errors.py) and its
log format (logs.py). Standard library only; every other folder may import it, and it imports none of them."""
