// logging: (to be written)
#pragma once
