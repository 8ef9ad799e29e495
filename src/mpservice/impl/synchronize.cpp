// synchronize: implementation (to be written)
