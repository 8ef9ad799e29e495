// threading: (to be written)
#pragma once
