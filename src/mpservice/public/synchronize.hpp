// synchronize: (to be written)
#pragma once
