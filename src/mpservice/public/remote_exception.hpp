// remote_exception: (to be written)
#pragma once
