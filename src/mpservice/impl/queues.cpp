// queues: implementation (to be written)
