// futures: (to be written)
#pragma once
