// process: (to be written)
#pragma once
