// queues: (to be written)
#pragma once
