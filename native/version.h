#pragma once

#define ADM_RUN_VERSION "0.1.0"
#ifdef ADM_EXECUTORCH_VERSION
#define ADM_EXECUTORCH_VERSION_TEXT "executorch " ADM_EXECUTORCH_VERSION
#else
#define ADM_EXECUTORCH_VERSION_TEXT "the executorch it was built against"
#endif
