"""What every layer shares, and nothing more: the errors omnistream raises on purpose (errors.py), its log
format (logs.py), the token stream's contract between pipelines/ and training/ (stream.py), a
checkpoint's file format between training/ and serving/ (checkpoint.py), and directories private to
their user (private.py). The standard library and numpy (torch and DeepSpeed only inside
checkpoint.load_weights_only); every other folder may import it, and it imports none of them."""
