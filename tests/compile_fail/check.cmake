# Compiles one tests/compile_fail/*.cpp and passes only if the compiler refuses
# it with the codec's message: it must mention the customization point
# (serialize / mpservice::Codec) and match the file's "// EXPECT: <regex>" line,
# which names the refused type.
#   cmake -DCXX=... -DSTD=17 -DINCLUDE=<repo root> -DSOURCE=<file> -P check.cmake
file(STRINGS ${SOURCE} expect_line REGEX "^// EXPECT: ")
string(REGEX REPLACE "^// EXPECT: " "" expect "${expect_line}")
execute_process(COMMAND ${CXX} -std=c++${STD} -fsyntax-only -I${INCLUDE} ${SOURCE}
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
if(rc EQUAL 0)
  message(FATAL_ERROR "${SOURCE} compiled, but the codec must refuse it")
endif()
if(NOT out MATCHES "serialize\\(Archive& ar\\)|serialize\\(Archive&\\)")
  message(FATAL_ERROR "${SOURCE}: the error does not name the customization point serialize(Archive&):\n${out}")
endif()
if(NOT out MATCHES "mpservice::Codec<T>")
  message(FATAL_ERROR "${SOURCE}: the error does not name mpservice::Codec<T>:\n${out}")
endif()
if(NOT out MATCHES "${expect}")
  message(FATAL_ERROR "${SOURCE}: the error does not name the type (expected /${expect}/):\n${out}")
endif()
message(STATUS "${SOURCE}: refused as expected")
