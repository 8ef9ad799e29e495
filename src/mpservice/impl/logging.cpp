// logging: implementation (to be written)
