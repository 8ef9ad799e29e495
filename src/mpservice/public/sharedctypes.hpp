// sharedctypes: (to be written)
#pragma once
