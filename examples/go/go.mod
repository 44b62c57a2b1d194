module fusedmoe

go 1.19
