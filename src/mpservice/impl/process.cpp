// process: implementation (to be written)
