// The one runtime-to-compile-time switch of the op bodies: a flag becomes a template argument
// by calling fn with std::true_type or std::false_type (read back as decltype(flag)::value);
// nested, a few flags pick one specialisation of a program.
#pragma once

#include <type_traits>

namespace depsep {

template <typename Fn>
void bool_switch(bool value, Fn&& fn) {
  if (value)
    fn(std::true_type{});
  else
    fn(std::false_type{});
}

}  // namespace depsep
