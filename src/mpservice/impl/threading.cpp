// threading: implementation (to be written)
