# Compiles one tests/compile_fail/*.cpp and passes only if the compiler refuses
# it.  By default it checks the codec's message: it must mention the customization point
# (serialize / mpservice::Codec) and match the file's "// EXPECT: <regex>" line,
# which names the refused type.
#   cmake -DCXX=... -DSTD=17 -DINCLUDE=<repo root> -DSOURCE=<file> -P check.cmake
# A file with an "// EXPECT-ASSERT: <regex>" line checks a static_assert of
# the library instead: the compiler must print exactly one error, and it must
# match the regex (one clear message, not a cascade from inside the library).
file(STRINGS ${SOURCE} assert_line REGEX "^// EXPECT-ASSERT: ")
if(assert_line)
  string(REGEX REPLACE "^// EXPECT-ASSERT: " "" expect "${assert_line}")
  execute_process(COMMAND ${CXX} -std=c++${STD} -fsyntax-only -I${INCLUDE} ${SOURCE}
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(rc EQUAL 0)
    message(FATAL_ERROR "${SOURCE} compiled, but the library must refuse it")
  endif()
  string(REGEX MATCHALL "error:" errors "${out}")
  list(LENGTH errors nerrors)
  if(NOT nerrors EQUAL 1)
    message(FATAL_ERROR "${SOURCE}: expected exactly one error, the compiler printed ${nerrors}:\n${out}")
  endif()
  if(NOT out MATCHES "${expect}")
    message(FATAL_ERROR "${SOURCE}: the error does not say /${expect}/:\n${out}")
  endif()
  message(STATUS "${SOURCE}: refused as expected, with one error")
  return()
endif()

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
