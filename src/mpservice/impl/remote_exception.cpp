// remote_exception: implementation (to be written)
